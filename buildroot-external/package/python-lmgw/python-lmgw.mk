################################################################################
#
# python-lmgw
#
################################################################################

# Built from the LMGW source tree, not downloaded: the version is the one
# firmware/pyproject.toml declares.
PYTHON_LMGW_SITE = $(BR2_EXTERNAL_LMGW_PATH)/../firmware
PYTHON_LMGW_SITE_METHOD = local
PYTHON_LMGW_VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' $(PYTHON_LMGW_SITE)/pyproject.toml)
PYTHON_LMGW_SETUP_TYPE = setuptools
# Leftovers of builds on the developer's machine: a stale build/lib would put
# removed modules back into the wheel.
PYTHON_LMGW_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--exclude /build --exclude '*.egg-info' --exclude __pycache__
PYTHON_LMGW_LICENSE = Proprietary

# The agent's account; its uid is fixed because the factory writes
# device.key as root:990 0640 on the identity partition. Same account as
# overlay/usr/lib/sysusers.d/lmgw.conf (the read-only root cannot run
# systemd-sysusers at boot); scripts/check.sh checks they agree.
define PYTHON_LMGW_USERS
	lmgw 990 lmgw 990 * /data/lmgw - dialout LMGW gateway agent
endef

$(eval $(python-package))
