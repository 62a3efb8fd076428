"""The `swarm` command and its subcommands."""
