################################################################################
#
# python-lmgw
#
################################################################################

# Built from the LMGW source tree, not downloaded: the version is the one
# firmware/pyproject.toml declares, read by the image library.
PYTHON_LMGW_SITE = $(BR2_EXTERNAL_LMGW_PATH)/../firmware
PYTHON_LMGW_SITE_METHOD = local
PYTHON_LMGW_VERSION := $(shell bash -c '. "$$0" && lmgw_package_version' $(BR2_EXTERNAL_LMGW_PATH)/../board/lib.sh)
PYTHON_LMGW_SETUP_TYPE = setuptools
# Leftovers of builds on the developer's machine: a stale build/lib would put
# removed modules back into the wheel.
PYTHON_LMGW_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--exclude /build --exclude '*.egg-info' --exclude __pycache__
PYTHON_LMGW_LICENSE = Proprietary
PYTHON_LMGW_LICENSE_FILES = LICENSE
# legal-info saves the licence, never the proprietary source.
PYTHON_LMGW_REDISTRIBUTE = NO

# The agent's account; its uid is fixed because the factory writes
# device.key as root:990 0640 on the identity partition. Same account as
# overlay/usr/lib/sysusers.d/lmgw.conf (the read-only root cannot run
# systemd-sysusers at boot); scripts/check.sh checks they agree.
define PYTHON_LMGW_USERS
	lmgw 990 lmgw 990 * /data/lmgw - dialout LMGW gateway agent
endef

$(eval $(python-package))
