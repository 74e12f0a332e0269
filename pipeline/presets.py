"""The six data sets of the paper: classes, ignore label, split sizes, class names, palettes, backbone.

Values follow the official experiment files (experiments/<name>/ddpm.json) and src/data_util.py of
yandex-research/ddpm-segmentation. Palettes are flat lists of RGB triples, one per class id.
"""
from __future__ import annotations

_FFHQ_PALETTE_FLOAT = [
    1.0000, 1.0000, 1.0000, 0.4420, 0.5100, 0.4234, 0.8562, 0.9537, 0.3188, 0.2405, 0.4699, 0.9918,
    0.8434, 0.9329, 0.7544, 0.3748, 0.7917, 0.3256, 0.0190, 0.4943, 0.3782, 0.7461, 0.0137, 0.5684,
    0.1644, 0.2402, 0.7324, 0.0200, 0.4379, 0.4100, 0.5853, 0.8880, 0.6137, 0.7991, 0.9132, 0.9720,
    0.6816, 0.6237, 0.8562, 0.9981, 0.4692, 0.3849, 0.5351, 0.8242, 0.2731, 0.1747, 0.3626, 0.8345,
    0.5323, 0.6668, 0.4922, 0.2122, 0.3483, 0.4707, 0.6844, 0.1238, 0.1452, 0.3882, 0.4664, 0.1003,
    0.2296, 0.0401, 0.3030, 0.5751, 0.5467, 0.9835, 0.1308, 0.9628, 0.0777, 0.2849, 0.1846, 0.2625,
    0.9764, 0.9420, 0.6628, 0.3893, 0.4456, 0.6433, 0.8705, 0.3957, 0.0963, 0.6117, 0.9702, 0.0247,
    0.3668, 0.6694, 0.3117, 0.6451, 0.7302, 0.9542, 0.6171, 0.1097, 0.9053, 0.3377, 0.4950, 0.7284,
    0.1655, 0.9254, 0.6557, 0.9450, 0.6721, 0.6162,
]
FFHQ_PALETTE = [int(v * 255) for v in _FFHQ_PALETTE_FLOAT]

BEDROOM_PALETTE = [
    255, 255, 255, 238, 229, 102, 255, 72, 69, 124, 99, 34, 193, 127, 15, 106, 177, 21, 248, 213, 43,
    252, 155, 83, 220, 147, 77, 99, 83, 3, 116, 116, 138, 63, 182, 24, 200, 226, 37, 225, 184, 161,
    233, 5, 219, 142, 172, 248, 153, 112, 146, 38, 112, 254, 229, 30, 141, 99, 205, 255, 74, 59, 83,
    186, 9, 0, 107, 121, 0, 0, 194, 160, 255, 170, 146, 255, 144, 201, 185, 3, 170, 221, 239, 255,
    0, 0, 53,
]
CAT_PALETTE = [
    255, 255, 255, 190, 153, 153, 250, 170, 30, 220, 220, 0, 107, 142, 35, 102, 102, 156, 152, 251, 152,
    119, 11, 32, 244, 35, 232, 220, 20, 60, 52, 83, 84, 194, 87, 125, 143, 176, 255, 31, 102, 211,
    104, 131, 101,
]
HORSE_PALETTE = [
    255, 255, 255, 255, 74, 70, 0, 137, 65, 0, 111, 166, 163, 0, 89, 255, 219, 229, 122, 73, 0, 0, 0, 166,
    99, 255, 172, 183, 151, 98, 0, 77, 67, 143, 176, 255, 241, 38, 110, 27, 210, 105, 128, 150, 147,
    228, 230, 158, 160, 136, 106, 79, 198, 1, 59, 93, 255, 115, 214, 209, 255, 47, 128,
]
CELEBA_PALETTE = [
    255, 255, 255, 238, 229, 102, 250, 150, 50, 124, 99, 34, 193, 127, 15, 225, 96, 18, 220, 147, 77,
    99, 83, 3, 116, 116, 138, 200, 226, 37, 225, 184, 161, 142, 172, 248, 153, 112, 146, 38, 112, 254,
    229, 30, 141, 52, 83, 84, 194, 87, 125, 248, 213, 42, 31, 102, 211,
]
ADE_BEDROOM_PALETTE = [  # the first 50 classes' palette; ade_bedroom_30 uses the first 90 values
    240, 156, 206, 69, 88, 93, 240, 49, 184, 27, 107, 126, 50, 82, 241, 54, 250, 147, 156, 213, 3,
    176, 108, 79, 251, 150, 149, 66, 51, 34, 210, 97, 53, 30, 53, 102, 232, 164, 118, 204, 150, 17,
    101, 86, 178, 249, 20, 213, 54, 35, 82, 157, 68, 216, 58, 161, 73, 174, 67, 67, 193, 181, 78,
    169, 60, 178, 220, 204, 166, 4, 127, 85, 245, 106, 216, 222, 172, 168, 84, 148, 105, 137, 220,
    89, 68, 252, 126, 29, 193, 187, 74,
]

BEDROOM_CLASSES = [
    "background", "bed", "bed***footboard", "bed***headboard", "bed***side rail", "carpet", "ceiling",
    "chandelier / ceiling fan blade", "curtain", "cushion", "floor", "table/nightstand/dresser",
    "table/nightstand/dresser***top", "picture / mirrow", "pillow", "lamp***column", "lamp***shade", "wall",
    "window", "curtain rod", "window***frame", "chair", "picture / mirror***frame", "plinth",
    "door / door frame", "pouf", "wardrobe", "plant", "table staff",
]
FFHQ_CLASSES = [
    "background", "head", "head***cheek", "head***chin", "head***ear", "head***ear***helix",
    "head***ear***lobule", "head***eye***bottom lid", "head***eye***eyelashes", "head***eye***iris",
    "head***eye***pupil", "head***eye***sclera", "head***eye***tear duct", "head***eye***top lid",
    "head***eyebrow", "head***forehead", "head***frown", "head***hair", "head***hair***sideburns",
    "head***jaw", "head***moustache", "head***mouth***inferior lip", "head***mouth***oral commissure",
    "head***mouth***superior lip", "head***mouth***teeth", "head***neck", "head***nose",
    "head***nose***ala of nose", "head***nose***bridge", "head***nose***nose tip", "head***nose***nostril",
    "head***philtrum", "head***temple", "head***wrinkles",
]
CAT_CLASSES = [
    "background", "back", "belly", "chest", "leg", "paw", "head", "ear", "eye", "mouth", "tongue", "nose",
    "tail", "whiskers", "neck",
]
HORSE_CLASSES = [
    "background", "person", "back", "barrel", "bridle", "chest", "ear", "eye", "forelock", "head", "hoof",
    "leg", "mane", "muzzle", "neck", "nostril", "tail", "thigh", "saddle", "shoulder", "leg protection",
]
CELEBA_CLASSES = [
    "background", "cloth", "ear_r", "eye_g", "hair", "hat", "l_brow", "l_ear", "l_eye", "l_lip", "mouth",
    "neck", "neck_l", "nose", "r_brow", "r_ear", "r_eye", "skin", "u_lip",
]
ADE_BEDROOM_CLASSES = [
    "wall", "bed", "floor", "table", "lamp", "ceiling", "painting", "windowpane", "pillow", "curtain",
    "cushion", "door", "chair", "cabinet", "chest", "mirror", "rug", "armchair", "book", "sconce", "plant",
    "wardrobe", "clock", "light", "flower", "vase", "fan", "box", "shelf", "television",
]


def _triples(flat: list[int]) -> list[list[int]]:
    return [list(flat[i:i + 3]) for i in range(0, len(flat), 3)]


#: name -> dataset fields (see pipeline.config.DatasetConfig), the default backbone checkpoint (a file name under
#: checkpoints/ddpm/, fetched by `ddpmseg fetch checkpoint <stem>`) and, optionally, "reproduce": config sections
#: that `ddpmseg reproduce` merges into the experiment it writes (none for the paper's data sets).
DATASET_PRESETS: dict[str, dict] = {
    "bedroom_28": dict(number_class=29, ignore_label=0, training_number=40, testing_number=20,
                       class_names=BEDROOM_CLASSES, palette=_triples(BEDROOM_PALETTE), checkpoint="lsun_bedroom.pt"),
    "ffhq_34": dict(number_class=34, ignore_label=255, training_number=20, testing_number=20,
                    class_names=FFHQ_CLASSES, palette=_triples(FFHQ_PALETTE), checkpoint="ffhq.pt"),
    "cat_15": dict(number_class=15, ignore_label=255, training_number=30, testing_number=20,
                   class_names=CAT_CLASSES, palette=_triples(CAT_PALETTE), checkpoint="lsun_cat.pt"),
    "horse_21": dict(number_class=21, ignore_label=255, training_number=30, testing_number=30,
                     class_names=HORSE_CLASSES, palette=_triples(HORSE_PALETTE), checkpoint="lsun_horse.pt"),
    "celeba_19": dict(number_class=19, ignore_label=255, training_number=20, testing_number=500,
                      class_names=CELEBA_CLASSES, palette=_triples(CELEBA_PALETTE), checkpoint="ffhq.pt"),
    "ade_bedroom_30": dict(number_class=30, ignore_label=255, training_number=50, testing_number=650,
                           class_names=ADE_BEDROOM_CLASSES, palette=_triples(ADE_BEDROOM_PALETTE[:90]),
                           checkpoint="lsun_bedroom.pt"),
}
PAPER_STEPS = [50, 150, 250]
PAPER_BLOCKS = [5, 6, 7, 8, 12]


#: Published mIoU (%) per preset, from shared/reference/official-behaviour.md: "paper" is the DDPM row of the
#: paper's table (value, ±); "reproduction" (the baseline re-run for 11 epochs) and "improved" (augmentations +
#: AdamW/dropout + TTA) are the later study's figures, published without a ±.
PUBLISHED_MIOU: dict[str, dict[str, tuple[float, float | None]]] = {
    "bedroom_28": {"paper": (49.4, 1.9), "reproduction": (50.05, None), "improved": (52.0, None),
                   "mae": (45.0, 2.0), "swav": (41.0, 2.3), "swav_w2": (42.4, 1.7)},
    "ffhq_34": {"paper": (59.1, 1.4), "reproduction": (57.91, None), "improved": (58.12, None),
                "mae": (58.8, 1.1), "swav": (54.7, 1.4), "swav_w2": (56.9, 1.3)},
    "cat_15": {"paper": (53.7, 3.3), "reproduction": (57.53, None), "improved": (59.54, None),
               "mae": (52.4, 2.3), "swav": (44.1, 2.1), "swav_w2": (45.1, 2.1)},
    "horse_21": {"paper": (65.0, 0.8), "reproduction": (64.03, None), "improved": (65.33, None),
                 "mae": (63.4, 1.4), "swav": (51.7, 0.5), "swav_w2": (54.0, 0.9)},
    "celeba_19": {"paper": (59.9, 1.0), "mae": (57.8, 0.4), "swav": (53.2, 1.0), "swav_w2": (52.4, 1.3)},
    "ade_bedroom_30": {"paper": (34.6, 1.7), "mae": (31.7, 1.8), "swav": (30.3, 1.5), "swav_w2": (30.6, 1.0)},
}
# "paper": the paper's DDPM row; "mae", "swav_w2": its baselines (MAE ViT-L/8, SwAV ResNet-50w2); "swav": SwAV
# ResNet-50 from the official repository's README; "reproduction" / "improved": the later study (no spread published).

# The sweep's lighter classifier per (block, step) (pipeline.analysis, `ddpmseg sweep` defaults): here, in a module
# without imports, so the command line's help shows them without loading torch.
SWEEP_DEFAULT_MEMBERS = 1  # a lighter classifier per (block, step) than the paper's 10-member ensemble
SWEEP_DEFAULT_EPOCHS = 5  # the official early stop ends training in the fifth epoch in practice
