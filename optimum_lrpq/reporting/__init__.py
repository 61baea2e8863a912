"""Reports on a quantized model: bit summaries and the relevance / bits plot."""
