"""ComfyUI nodes of the ReNoise pack."""

from .file_nodes import ReNoiseLoadInversion, ReNoiseSaveInversion
from .local_edit_nodes import ReNoiseEditMask
from .renoise_nodes import EditFriendlyInvert, EditLossConfig, NoiseCorrection, ReNoiseInvert, ReNoiseSampler, ReNoiseSolver

NODE_CLASS_MAPPINGS = {
    "ReNoiseInvert": ReNoiseInvert,
    "ReNoiseSampler": ReNoiseSampler,
    "NoiseCorrection": NoiseCorrection,
    "EditLossConfig": EditLossConfig,
    "ReNoiseSolver": ReNoiseSolver,
    "ReNoiseSaveInversion": ReNoiseSaveInversion,
    "ReNoiseLoadInversion": ReNoiseLoadInversion,
    "EditFriendlyInvert": EditFriendlyInvert,
    "ReNoiseEditMask": ReNoiseEditMask,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ReNoiseInvert": "ReNoise Invert",
    "ReNoiseSampler": "ReNoise Sampler (replay noises)",
    "NoiseCorrection": "ReNoise Noise Correction",
    "EditLossConfig": "ReNoise Edit Loss Config",
    "ReNoiseSolver": "ReNoise Solver",
    "ReNoiseSaveInversion": "ReNoise Save Inversion",
    "ReNoiseLoadInversion": "ReNoise Load Inversion",
    "EditFriendlyInvert": "Edit-Friendly DDPM Invert",
    "ReNoiseEditMask": "ReNoise Edit Mask (DiffEdit)",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
