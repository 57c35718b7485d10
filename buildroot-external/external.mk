include $(sort $(wildcard $(BR2_EXTERNAL_LMGW_PATH)/package/*/*.mk))
