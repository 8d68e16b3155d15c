"""edgefleet.fleet."""
