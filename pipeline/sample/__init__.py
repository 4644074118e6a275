"""The embedded sample: simulated meteorology and chemistry on real terrain (`simulate`, `terrain`),
written as a raw source in real-data conventions (`write`) so `make demo` runs the path real users run.
Apart from the production graph on purpose: nothing in sources -> features -> store -> shards imports it."""
