"""report.html: a self-contained page per run (report text, tables, figures, interactive explorers)."""
from vitsparse_jax.report_html.page import (
                                            Explorer,
                                            decode_array,
                                            encode_array,
                                            image_data_url,
                                            static_text,
                                            write_report_html,
)

__all__ = ["Explorer", "decode_array", "encode_array", "image_data_url", "static_text", "write_report_html"]
