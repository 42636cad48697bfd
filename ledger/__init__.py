"""The system of record: the event catalog, the store, positions, projections and migrations."""
