"""A typical Python ML service: heavy imports, a model trained at start, HTTP."""
import json
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pandas as pd
import scipy.stats
from sklearn.ensemble import RandomForestClassifier
from sklearn.datasets import make_classification

X, y = make_classification(n_samples=20000, n_features=20, random_state=0)
frame = pd.DataFrame(X)
model = RandomForestClassifier(n_estimators=40, random_state=0).fit(frame.values, y)
SKEW = float(scipy.stats.skew(X[:, 0]))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            body = b"ok"
        else:
            pred = int(model.predict(np.zeros((1, 20)))[0])
            body = json.dumps({"prediction": pred, "skew": SKEW, "pid": os.getpid()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


print("pyml: model trained, serving on 127.0.0.1:8091", flush=True)
HTTPServer(("127.0.0.1", 8091), Handler).serve_forever()
