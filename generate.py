"""Draw images from a saved text-to-image pipeline.

    python generate.py --model outputs/pipeline --prompt "red heart" --prompt "cat face" \
        --scheduler dpm++2m_karras --num_inference_steps 25 --seed 0 --output_dir samples

Run `python generate.py --help` for every option; the work is done in ldm/generate.py.
"""

import sys

from ldm.generate import main

if __name__ == "__main__":
    sys.exit(main())
