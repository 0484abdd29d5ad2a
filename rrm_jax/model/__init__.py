"""The Qwen2 decoder and everything about its weights.

config            Qwen2Config and the presets named after released checkpoints
weights           one record per parameter: shape, logical axes, Hugging Face name and layout, initialiser
qwen2             the model: parameters, the forward pass, prefill and the decode steps over a KV cache
decode_attention  the decode step's ragged attention (XLA, or a Pallas kernel on GPU / TPU)
hf                Hugging Face folders: config.json, safetensors read and written block by block
convert           `rrm-jax convert`: HF folder <-> rrm-jax checkpoint
"""
