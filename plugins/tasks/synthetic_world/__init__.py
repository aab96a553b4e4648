"""The synthetic world: procedurally generated scenes of coloured shapes
(`world.py`), four tasks on it in the formats of SNLI-VE, VQA v2, NLVR2 and
COCO captions (`tasks.py`), and their caption corpus for pretraining
(`world_captions_task` with its own sizes). Nothing is downloaded; every split
is a function of its bindings and seed."""
