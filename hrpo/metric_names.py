"""Names of the metrics HRPO logs besides TRL's, where more than one module reads them. Every
HRPO metric is under a prefix (``thinking/``, ``thinking_projection/``), as TRL groups its own."""

# the mean over mixed positions of the gate a and of sqrt(1 - a^2) (HRPO's embeds and hidden ratios)
GATE_RATIO_METRIC = "thinking/embeds_ratio"
HIDDEN_RATIO_METRIC = "thinking/hidden_ratio"
# the names runs logged before the prefix, read as the new ones
RENAMED_METRICS = {"embeds_ratio": GATE_RATIO_METRIC, "hidden_ratio": HIDDEN_RATIO_METRIC}
