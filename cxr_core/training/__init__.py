"""Making and judging models: labelled folders and their checks, training (one process or
several), calibration, evaluation, the gate's fit, site validation and site adaptation."""
