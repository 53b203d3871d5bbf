"""The planner: for a model on a cluster, which layout, how much memory per GPU and how
fast, from the lab's theory and constants calibrated on the lab's own runs.

Data flow: ``shape`` (the model) and ``hardware`` (the device and links) -> ``layout``
(degrees, checks) -> ``memory`` and ``step_time`` (the predictions) -> ``search``
(enumerate, rank) -> ``render`` (table, picture) and ``__main__`` (the command);
``runs`` and ``calibrate`` fit ``hardware``'s constants to measured runs (or a GPU's
measured matmul rates); ``published`` holds the published results the predictions are
checked against and ``replay`` predicts them.
"""
