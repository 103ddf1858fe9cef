"""modular: grow language models from pluggable experts behind learned routers.

Compose a model from config, continue pretraining it as domains arrive (adding, freezing and merging
experts), and export the result to Hugging Face formats.
"""

__version__ = "0.1.0"
