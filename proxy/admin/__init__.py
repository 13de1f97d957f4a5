"""The admin listener: operators' view of backends, versions and sessions."""
