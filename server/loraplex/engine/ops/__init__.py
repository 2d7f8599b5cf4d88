"""The step's tensor ops, one interface each (attention, LoRA delta), with a backend per device."""
