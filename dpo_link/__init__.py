"""Preference pairs, DPO training glue (TRL + PEFT), implicit rewards and the D-LEAF/DPO correspondence statistics."""
