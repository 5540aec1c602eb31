#!/usr/bin/env python
"""Train and evaluate FastInst / OneFormer on Cityscapes (+ InstSynth synthetic data), Detectron2-style.

    python train_net.py --config-file configs/cityscapes/instance-segmentation/fastinst_R50_ppm-fpn_x1_576_D1.yaml
    python train_net.py --config-file CONFIG --num-gpus 4                    # one machine, 4 GPUs
    accelerate launch --num_processes 4 train_net.py --config-file CONFIG    # or torchrun --nproc_per_node 4
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file CONFIG --resume                        # continue from last_checkpoint
"""
import argparse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE", help="path to the YAML config")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/last_checkpoint (model, optimizer, scheduler, iteration)")
    p.add_argument("--eval-only", action="store_true",
                   help="only evaluate MODEL.WEIGHTS (or the last checkpoint with --resume)")
    p.add_argument("--num-gpus", type=int, default=1, help="processes (GPUs) per machine")
    p.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    p.add_argument("--machine-rank", type=int, default=0, help="rank of this machine (0 .. num-machines - 1)")
    p.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0 ('auto': a free local port)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides as KEY VALUE pairs, e.g. SOLVER.MAX_ITER 1000 "
                        "(the word 'opts' may precede them)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    from instsynth.config import load_config
    from instsynth.engine.trainer import run

    opts = args.opts[1:] if args.opts[:1] == ["opts"] else args.opts
    cfg = load_config(args.config_file or None, opts)
    return run(cfg, eval_only=args.eval_only, resume=args.resume)


if __name__ == "__main__":
    cli = parse_args()
    from instsynth.cli import command
    from instsynth.engine.launch import launch

    command(launch)(main, cli.num_gpus, cli.num_machines, cli.machine_rank, cli.dist_url, args=(cli,))
