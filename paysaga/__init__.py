"""paysaga's runtime glue: settings, the CLI, the embedded dev stack and its supervisor."""
