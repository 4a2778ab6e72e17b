"""The pack's menu category: every node sits under it, in one sub-category per method."""

CATEGORY = "UltraRes"
