"""The FastAPI application that client systems and operations use."""
