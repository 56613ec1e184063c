"""otacm's command line and configuration: the edge where the process meets its operator."""
