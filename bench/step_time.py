"""OPTIMA step vs layerwise-baseline step, timed in one run: prints their ratio.

An OPTIMA step back-propagates only the played arm's layer losses and computes
the other layers' losses under no_grad for the reward; a layerwise step
back-propagates every layer and needs no reward. The OPTIMA figure is the mean
over all 7 arms. Same models, batch and optimizer for both. The third row is an
OPTIMA step that also measures the gradient alignment (`alignment_reward`: two
more backward passes through the student), against the OPTIMA step.

    python bench/step_time.py            # CPU, small CoCa, ~1 minute
    BATCH=64 WIDTH=256 python bench/step_time.py
"""
import json
import os
import statistics
import time

import torch

from optima.arms import ArmSpace
from optima.engine import ALIGN, BatchStream, Distiller, Network
from optima.plugins.models.coca import coca_model
from optima.plugins.heads.vl_heads import AttentionalPoolerHead
from optima.plugins.losses.optima_loss import optima_loss
from optima.plugins.policies.paper import FixedPolicy
from optima.plugins.rewards.loss_decrement import combined_reward
from optima.plugins.tasks.synthetic_ve import SyntheticVisualEntailment

B = int(os.environ.get("BATCH", 32))
W = int(os.environ.get("WIDTH", 128))
REPEATS = int(os.environ.get("REPEATS", 5))


def arch(layers):
    heads = max(1, W // 32)
    return {"embed_dim": W,
            "vision_cfg": {"image_size": 64, "patch_size": 8, "width": W, "layers": layers, "head_width": 32,
                           "attentional_pool": True, "attn_pooler_queries": 32, "attn_pooler_heads": heads,
                           "output_tokens": True},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": W, "heads": heads, "layers": layers,
                         "embed_cls": True, "output_tokens": True},
            "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": W, "heads": heads,
                               "layers": layers, "attn_pooler_heads": heads}}


def main():
    torch.manual_seed(0)
    dev = torch.device("cpu")
    task = SyntheticVisualEntailment(image_size=64, train_size=B * 4, val_size=0, test_size=0)
    teacher_m, student_m = coca_model(arch(8)), coca_model(arch(4), layers=(4, 4, 4))
    teacher = Network(teacher_m, AttentionalPoolerHead(W, 3))
    student = Network(student_m, AttentionalPoolerHead(W, 3))
    loss = optima_loss(student_m.distill_modules(), teacher_m.distill_modules())
    opt = torch.optim.AdamW(list(student.parameters()) + list(loss.parameters()), lr=1e-4)
    arms = ArmSpace(student_m.module_names())
    d = Distiller(teacher=teacher, student=student, task=task, loss=loss, arms=arms,
                  policy=FixedPolicy(len(arms)), reward=combined_reward(), optimizer=opt,
                  scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                  stream=BatchStream(task, "train", B, 0, dev), steps_per_round=1, rounds=1, device=dev)
    batch = next(d.stream)

    def timed(arm, need, n=3):
        d.need = need
        layers = d.arm_layers(arm)
        d.train_step(batch, layers)  # warm-up
        t = time.perf_counter()
        for _ in range(n):
            d.train_step(batch, layers)
        return (time.perf_counter() - t) / n

    optima_need = frozenset(combined_reward().terms)
    ratios, opt_times, lw_times, align_times, align_ratios = [], [], [], [], []
    for _ in range(REPEATS):  # interleave so machine noise hits all alike
        lw = timed(len(arms) - 1, frozenset())
        op = statistics.mean(timed(k, optima_need, n=1) for k in range(len(arms)))
        al = statistics.mean(timed(k, optima_need | {ALIGN}, n=1) for k in range(len(arms)))
        lw_times.append(lw)
        opt_times.append(op)
        align_times.append(al)
        ratios.append(op / lw)
        align_ratios.append(al / op)
    result = {"batch": B, "width": W, "teacher_layers": 8, "student_layers": 4, "torch_threads": torch.get_num_threads(),
              "layerwise_ms": 1e3 * statistics.median(lw_times), "optima_ms": 1e3 * statistics.median(opt_times),
              "optima_over_layerwise": statistics.median(ratios), "alignment_ms": 1e3 * statistics.median(align_times),
              "alignment_over_optima": statistics.median(align_ratios)}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
