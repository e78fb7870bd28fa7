import subprocess
import sys


def test_core_does_not_import_streamlit():
    code = ("import sys, explorer, explorer.models, explorer.data, explorer.train, explorer.baselines; "
            "import importlib, pkgutil; "
            "[importlib.import_module('explorer.' + m.name) for m in pkgutil.iter_modules(explorer.__path__) "
            " if m.name != '__main__']; "
            "print('streamlit' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
