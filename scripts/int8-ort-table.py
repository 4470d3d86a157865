"""The int8 Q/DQ table from sweeps' results.json: mAP50-95 and its drop against the fp32 onnxruntime reference
on the same images, per placement and calibrator.

    python scripts/int8-ort-table.py results/int8-ort/*.json > results/int8-ort/table.md
"""
import json
import sys

from markdown_table import print_table


def rows(path: str):
    for r in json.load(open(path)):
        q, check = r["export"]["tested"]["quantization"], r["validate"]["shapes"]["static"]
        placement = "Conv, Add, Concat; head pinned" if q["kept_float_nodes"] else "Conv only, no pins"
        quantized = ", ".join(f"{op} {n}" for op, n in sorted(q["quantized"].items()))
        yield (placement, q["calibrator"], quantized, len(q["kept_float_nodes"]), f"{check['ref_map50_95']:.3f}",
               f"{check['map50_95']:.3f}", f"{check['ref_map50_95'] - check['map50_95']:.3f}", f"{check['detections']['f1']:.3f}",
               r["status"] + (f" ({r['failed_stage']})" if r["failed_stage"]
                                                                   else ""))


def main(paths: list[str]) -> None:
    header = ["placement", "calibrator", "quantized nodes", "kept float", "fp32 mAP50-95", "int8 mAP50-95",
              "drop", "det F1", "status"]
    print_table(header, (row for path in paths for row in rows(path)))


if __name__ == "__main__":
    main(sys.argv[1:])
