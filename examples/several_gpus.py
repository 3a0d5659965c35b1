"""Several GPUs (or CPU processes) under torchrun: `accelerate(model, parallel="ep")` splits each MoE
layer's experts over the ranks, "tp" splits attention heads and each expert's inner dimension, "dp"
keeps a replica per rank. Every rank loads the same model on the CPU; accelerate() keeps its share
and moves it to its GPU (cuda:LOCAL_RANK). Rank 0 prints.

    torchrun --nproc-per-node 2 examples/several_gpus.py --parallel ep               # 2 GPUs, NCCL
    torchrun --nproc-per-node 2 examples/several_gpus.py --parallel tp --device cpu  # 2 CPU processes, gloo

Without torchrun it prints how to launch it and runs the model in one process (where, with several
GPUs, `accelerate(model, devices=[0, 1], parallel="pp")` would place its layers over them).
"""

import os

import torch
import torch.distributed as dist

from _common import inputs, load, parser
from hf_moe_accel import accelerate


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--parallel", choices=["ep", "tp", "dp"], default="ep")
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address
        if args.device != "cpu":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    else:
        print(f"one process: launch `torchrun --nproc-per-node 2 {os.path.relpath(__file__)} --parallel {args.parallel}"
              f"{' --device cpu' if args.device == 'cpu' else ''}` to split the model over 2 ranks")
    rank0 = not distributed or dist.get_rank() == 0

    model, tokenizer = load(args.model, args.device, device_map="cpu")  # the same weights on every rank
    batch = inputs(model, tokenizer)
    greedy = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        stock = model.generate(**batch, **greedy) if args.device == "cpu" else None  # stock, one process, for comparison
        if distributed:  # each rank keeps its share; devices="cpu" runs the shares on CPU processes
            accelerate(model, parallel=args.parallel, devices="cpu" if args.device == "cpu" else None)
        else:
            accelerate(model.to(args.device))
        batch = {k: v.to(args.device) for k, v in batch.items()}
        ours = model.generate(**batch, **greedy)  # every rank runs generate(): the ranks' collectives meet

    if rank0:
        world = dist.get_world_size() if distributed else 1
        print(f"parallel={args.parallel if distributed else 'single'} over {world} process(es) on {args.device}")
        for row in ours[:, batch["input_ids"].shape[1]:]:
            print("generated:", repr(tokenizer.decode(row, skip_special_tokens=True)))
        if stock is not None:
            print(f"tokens equal stock: {torch.equal(ours.cpu(), stock)}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
