# LMGW: every target installs what it needs through `deps` (Debian + PyPI only).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MITM_VENV := .venv-mitm
MITMPROXY_VERSION := 11.0.2
# Host tools from Debian, one line per area (each area appends its own).
APT_PACKAGES := tinyproxy
APT_PACKAGES += socat

.PHONY: deps host-packages demo test bench clean

deps: host-packages $(VENV)/.stamp $(MITM_VENV)/.stamp

host-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.stamp: firmware/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e 'firmware[test,image]'
	touch $@

# mitmproxy pins its own cryptography: it lives in a venv of its own.
$(MITM_VENV)/.stamp: Makefile
	$(PYTHON) -m venv $(MITM_VENV)
	$(MITM_VENV)/bin/pip install -q mitmproxy==$(MITMPROXY_VERSION)
	touch $@

demo: deps
	qemu/demo_host.sh

test: deps
	$(VENV)/bin/pytest tests

bench: deps
	$(PY) tests/bench/run.py

clean:
	rm -rf $(VENV) $(MITM_VENV) build
