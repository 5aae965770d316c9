"""Planning: compile a caching plan (a `Schedule`) from the model's measured redundancy."""
