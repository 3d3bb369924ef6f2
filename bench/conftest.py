import os
import sys

# bench/ modules import each other (timing.py) without being a package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
