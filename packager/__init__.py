"""edgefleet.packager."""
