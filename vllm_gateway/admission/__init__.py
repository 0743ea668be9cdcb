"""Admission: which request goes to a model's servers next, and when. `local` holds the counts in
this worker's memory; `shared` holds them in Redis for several workers, its decisions Lua `scripts`
sent over a pipelined client of its own (`redis_pipe`)."""
