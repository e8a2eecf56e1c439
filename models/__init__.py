"""The contract shared by the projector (writer) and the API (reader)."""
