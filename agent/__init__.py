"""edgefleet.agent."""
