"""Cross-tokenizer alignment: token bytes per tokenizer family, and rows matched through bytes."""

from merge_distill.align.alignment import RowAlignment, align_row, spans
from merge_distill.align.token_bytes import PROBE, TokenBytes, byte_decoder, special_counterparts, tokenizer_family

__all__ = ["PROBE", "RowAlignment", "TokenBytes", "align_row", "byte_decoder", "spans", "special_counterparts",
           "tokenizer_family"]
