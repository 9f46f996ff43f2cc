"""Data: COCO instances JSON (canonical), the synthetic embedded dataset, VOC / YOLO converters.

See docs/data.md for the formats and conventions. Nothing here imports pycocotools.
"""
from .coco import (CocoDetection, CocoIndex, collate, default_image_root, image_size, image_to_tensor, load_coco,
                   load_image, load_image_tensor)
from .convert import voc_to_coco, yolo_to_coco
from .synth import SYNTH_CLASSES, generate_synthetic, render_image

__all__ = ["CocoDetection", "CocoIndex", "collate", "default_image_root", "image_size", "image_to_tensor", "load_coco",
           "load_image", "load_image_tensor", "voc_to_coco", "yolo_to_coco", "SYNTH_CLASSES", "generate_synthetic",
           "render_image"]
