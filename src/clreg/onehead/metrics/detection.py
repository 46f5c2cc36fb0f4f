"""COCO mAP through pycocotools, with per-image match records re-accumulated for each resample."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
from torch import Tensor

__all__ = ["DetectionMetric"]


class DetectionMetric:
    """COCO mAP through pycocotools, with per-image records for resampling.

    Args:
        coco_gt: a ``pycocotools.coco.COCO`` holding the original annotations (original sizes), with
            only the evaluated categories.
        iou_type: ``"bbox"``.
    """

    def __init__(self, coco_gt: Any) -> None:
        self.coco_gt = coco_gt
        self._dets: list[dict] = []
        self._ids: list = []
        self._eval = None
        self._records: list[dict] | None = None

    @property
    def n(self) -> int:
        return len(self._ids)

    def image_ids(self) -> list:
        return list(self._ids)

    def update(self, image_id: int, boxes: Tensor, scores: Tensor, category_ids: Tensor | list[int]) -> None:
        """Detections of one image, boxes (D, 4) as x1, y1, x2, y2 at the image's original size."""
        self._ids.append(image_id)
        for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), scores.tolist(), list(map(int, category_ids))):
            self._dets.append({"image_id": image_id, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
        self._eval = None

    def evaluate(self) -> Any:
        """Run COCOeval once (quietly) on the images seen; returns the COCOeval object."""
        if self._eval is not None:
            return self._eval
        from pycocotools.cocoeval import COCOeval

        if not self._ids:
            raise ValueError("no images were scored")
        with contextlib.redirect_stdout(io.StringIO()):
            dt = self.coco_gt.loadRes(self._dets) if self._dets else _empty_results(self.coco_gt)
            ev = COCOeval(self.coco_gt, dt, "bbox")
            ev.params.imgIds = list(self._ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        self._eval = ev
        self._records = None
        return ev

    def value(self) -> float:
        """mAP@0.5."""
        return float(max(self.evaluate().stats[1], 0.0))

    def map_50_95(self) -> float:
        return float(max(self.evaluate().stats[0], 0.0))

    def per_class_ap(self) -> dict[int, float]:
        """AP@0.5 per category id (NaN where the category has no ground truth here)."""
        ev = self.evaluate()
        t = int((ev.params.iouThrs == 0.5).nonzero()[0][0])
        prec = torch.as_tensor(ev.eval["precision"][t, :, :, 0, -1])  # (R, K)
        out = {}
        for k, cat in enumerate(ev.params.catIds):
            col = prec[:, k]
            out[int(cat)] = float(col.mean()) if (col > -1).all() else float("nan")
        return out

    def _build_records(self) -> list[dict]:
        ev = self.evaluate()
        p = ev.params
        n_img, n_area = len(p.imgIds), len(p.areaRng)
        pos = {img: i for i, img in enumerate(p.imgIds)}
        max_det = p.maxDets[-1]
        records = []
        for k, _cat in enumerate(p.catIds):
            scores, matched, ignored, img_of_det, gt_per_img = [], [], [], [], torch.zeros(n_img, dtype=torch.float64)
            for i in range(n_img):
                e = ev.evalImgs[k * n_area * n_img + i]  # area index 0: "all"
                if e is None:
                    continue
                d = len(e["dtScores"][:max_det])
                scores.append(torch.as_tensor(e["dtScores"][:max_det], dtype=torch.float64))
                matched.append(torch.as_tensor(e["dtMatches"][:, :max_det] > 0).reshape(len(p.iouThrs), d))
                ignored.append(torch.as_tensor(e["dtIgnore"][:, :max_det]).bool().reshape(len(p.iouThrs), d))
                img_of_det.append(torch.full((d,), pos[e["image_id"]], dtype=torch.long))
                gt_per_img[pos[e["image_id"]]] = float((torch.as_tensor(e["gtIgnore"]) == 0).sum())
            n_thr = len(p.iouThrs)
            m = torch.cat(matched, 1) if matched else torch.zeros(n_thr, 0, dtype=torch.bool)
            ig = torch.cat(ignored, 1) if ignored else torch.zeros(n_thr, 0, dtype=torch.bool)
            s = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
            img = torch.cat(img_of_det) if img_of_det else torch.zeros(0, dtype=torch.long)
            order = torch.as_tensor(_mergesort_desc(s.tolist()), dtype=torch.long)
            counted = ~ig[:, order]  # detections matched to ignored (crowd) boxes count neither way
            tp, fp = m[:, order] & counted, ~m[:, order] & counted
            # past the last true positive (at any IoU threshold) a detection raises no recall and only
            # lowers precision below the envelope, so no AP depends on it: drop it
            hits = tp.any(0).nonzero()
            end = int(hits[-1]) + 1 if len(hits) else 0
            records.append({"tp": tp[:, :end], "fp": fp[:, :end], "img": img[order][:end], "gt": gt_per_img})
        # map image positions in COCOeval's order to this metric's order
        self._order = torch.as_tensor([pos[i] for i in self._ids])
        return records

    def scores(self, counts: Tensor, iou: str = "0.5") -> Tensor:
        """mAP@0.5 (``iou="0.5"``) or mAP@[.5:.95] (``iou="0.5:0.95"``) for each resample."""
        if self._records is None:
            self._records = self._build_records()
        ev = self._eval
        # counts are in this metric's image order; COCOeval's order is params.imgIds
        w_img = torch.zeros_like(counts)
        w_img[:, self._order] = counts
        rec_thrs = torch.as_tensor(ev.params.recThrs, dtype=torch.float64)
        t_sel = (
            [int((torch.as_tensor(ev.params.iouThrs) - 0.5).abs().argmin())]
            if iou == "0.5"
            else list(range(len(ev.params.iouThrs)))
        )
        per_cat, valid = [], []
        for rec in self._records:
            npig = w_img @ rec["gt"]  # (R,)
            valid.append(npig > 0)
            tp = rec["tp"][t_sel].double()  # (T, D)
            fp = rec["fp"][t_sel].double()
            if tp.shape[1] == 0:
                per_cat.append(torch.zeros(counts.shape[0], dtype=torch.float64))
                continue
            w = w_img[:, rec["img"]]  # (R, D)
            tps = torch.cumsum(w[:, None, :] * tp[None], -1)
            fps = torch.cumsum(w[:, None, :] * fp[None], -1)
            rc = tps / npig.clamp(min=1e-12)[:, None, None]
            pr = tps / (tps + fps + 2.220446049250313e-16)
            pr = torch.flip(torch.cummax(torch.flip(pr, [-1]), -1).values, [-1])
            thr = rec_thrs.expand(*rc.shape[:2], -1).contiguous()
            idx = torch.searchsorted(rc.contiguous(), thr, side="left")
            q = torch.gather(pr, -1, idx.clamp(max=pr.shape[-1] - 1)) * (idx < pr.shape[-1])
            per_cat.append(q.mean(-1).mean(-1))  # mean over recall thresholds, then IoU thresholds
        ap = torch.stack(per_cat, 1)  # (R, K)
        ok = torch.stack(valid, 1)
        return (ap * ok).sum(1) / ok.sum(1).clamp(min=1)


def _mergesort_desc(values: list[float]) -> list[int]:
    """Indices sorting ``values`` descending, ties kept in order (NumPy's stable mergesort of −v)."""
    return sorted(range(len(values)), key=lambda i: -values[i])


def _empty_results(coco_gt: Any) -> Any:
    from pycocotools.coco import COCO

    res = COCO()
    res.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"], "annotations": []}
    res.createIndex()
    return res
