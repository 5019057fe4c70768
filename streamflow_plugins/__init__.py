"""StreamFlow plugins shipped with xffl-cwl (registered through the unito.streamflow.plugin entry point)."""
