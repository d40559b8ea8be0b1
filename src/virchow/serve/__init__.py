"""HTTP serving of Virchow embeddings with the Azure ML online endpoint schema.

``virchow serve`` runs :func:`virchow.serve.app.create_app` on uvicorn; :mod:`virchow.serve.scoring`
serves the same schema inside Azure's own inference server. Submodules are imported on use, so this
package import stays light.
"""
