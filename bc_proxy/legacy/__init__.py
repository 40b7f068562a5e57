"""Legacy Bulletin Connect surface: routes, credential checks and exact wire formats."""
