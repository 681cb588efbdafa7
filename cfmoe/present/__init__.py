"""Presentation: one plot style (`plots`), the headline summary (`report`), notebook-chain helpers."""
