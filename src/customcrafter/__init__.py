"""CustomCrafter: subject-customized text-to-video on VideoCrafter2 (diffusers ecosystem)."""

__version__ = "0.1.0"
