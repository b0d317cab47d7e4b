"""Interoperability with other tools' adapter formats (Hugging Face peft)."""

from vpeft.interop.peft_lora import PEFT_SUBDIR, export_to_peft, import_from_peft, peft_folder, peft_num_classes

__all__ = ["PEFT_SUBDIR", "export_to_peft", "import_from_peft", "peft_folder", "peft_num_classes"]
