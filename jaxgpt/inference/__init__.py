"""Using a trained model: generation with the KV cache (generate, sampling, kv_cache), the decoding
copy of the weights (decoding_copy), the HTTP server (serve over continuous + slots or batcher;
requests, chat, metrics, http_plumbing, playground.html) and attention maps (attention_map).
"""
