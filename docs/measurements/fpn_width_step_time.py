"""Training-step time of Faster R-CNN at several FPN / box-head widths (160 px, batch 8, one real synthetic batch).

Usage: python docs/measurements/fpn_width_step_time.py THREADS BACKBONE,FPN,BOXHEAD,SIZE,ROIS ...
Measured 2026-11-24 on the 2-core CPU, 1 thread, quiet machine (best of 3 steps after one warm-up):
  resnet50,256,1024,160,64 3.775 s   resnet18,256,1024,160,64 2.852 s   resnet18,128,256,160,64 1.259 s
  resnet18,64,256,160,64 0.908 s     resnet50,128,512,160,64 2.299 s    resnet34,128,512,160,64 1.755 s
"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from kd.config import ModelConfig
from kd.models.detectors import build_detector
from kd.data import load_coco, CocoDetection, collate
idx = load_coco("data/synth/train.json", image_root="data/synth/images")
for spec in sys.argv[2:]:
    bb, ch, dim, size, rois = spec.split(",")
    cfg = ModelConfig(backbone=bb, fpn_channels=int(ch), box_head_dim=int(dim), min_size=int(size), max_size=int(size),
                      anchor_sizes=(8,16,32,64,128), rois_per_image=int(rois), num_classes=6)
    m = build_detector(cfg); m.train()
    ds = CocoDetection(idx, train=True, min_size=int(size), max_size=int(size))
    imgs, tg = collate([ds[i] for i in range(8)])
    opt = torch.optim.SGD(m.parameters(), lr=0.001)
    ts = []
    for i in range(4):
        t = time.perf_counter(); loss = sum(m(list(imgs), list(tg)).values()); loss.backward(); opt.step(); opt.zero_grad(); ts.append(time.perf_counter() - t)
    print(spec, "s/step %.3f" % min(ts[1:]), "params %.1fM" % (sum(p.numel() for p in m.parameters())/1e6), flush=True)
