"""Grow the data partition and its file system to the end of the card on first boot.

An image is written to cards of any size; its data partition is the last one
and as small as the layout makes it. ``python3 -m lmgw.growdata`` (run by
``lmgw-grow-data.service`` at every boot) extends it to the end of the disk
and then grows the mounted ext4 file system. Each step is safe against a
power cut and the whole is idempotent, so the next boot finishes what a cut
interrupted (``gpt.plan_growth`` says why); once grown it only reads the table.
"""
