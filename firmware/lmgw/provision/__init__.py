"""Factory provisioning: write a gateway's identity into its disk image or SD card."""
