"""Training: the driver that checks a run and starts its Ray Train workers (`driver`), the loop each
worker runs (`loop`) with its DeepSpeed engine, learning-rate schedule, loss window, memory meter and
fault handling, and the console that shows a run's progress."""
