"""HRPO with a learnable thinking projection: the project's own code (not the forks)."""

# LoRA goes on these seven projections of every decoder layer (the thinking modules are trained in full).
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
