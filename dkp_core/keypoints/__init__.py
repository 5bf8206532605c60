"""AutoLink keypoint model (detector, link map, masking, decoder); see docs/model.md."""
from dkp_core.keypoints.autolink import AutoLink, AutoLinkOutput, convert_autolink_state_dict
from dkp_core.keypoints.decoder import Decoder
from dkp_core.keypoints.detector import (FEATURE_NAMES, DetectorOutput, KeypointDetector,
                                         coordinate_grid, init_autolink_weights, soft_argmax)
from dkp_core.keypoints.links import LinkRenderer, segment_sq_distance
from dkp_core.keypoints.masking import random_block_mask

__all__ = [
    "AutoLink", "AutoLinkOutput", "convert_autolink_state_dict", "Decoder", "FEATURE_NAMES",
    "DetectorOutput", "KeypointDetector", "coordinate_grid", "init_autolink_weights", "soft_argmax",
    "LinkRenderer", "segment_sq_distance", "random_block_mask",
]
