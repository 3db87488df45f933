// PostHog's own HogQL parser (@posthog/hogql-parser, WASM) for the fake
// PostHog server (../fake_posthog.py).  One long-lived process per fake:
// each line on stdin is a JSON request {"id": n, "query": "SELECT ..."}
// (or {"id": n, "expr": "..."}), each answer one JSON line on stdout:
// {"id": n, "ast": {...}} or {"id": n, "ast": {"error": true, "type",
// "message", ...}} as the parser returns it.  Uses nothing newer than
// Node 18.
import createHogQLParser from '@posthog/hogql-parser'
import { createInterface } from 'node:readline'

const parser = await createHogQLParser()
process.stdout.write(JSON.stringify({ ready: true }) + '\n')

const rl = createInterface({ input: process.stdin, crlfDelay: Infinity })
rl.on('line', (line) => {
    if (!line.trim()) return
    let req
    let out
    try {
        req = JSON.parse(line)
        const text = req.expr !== undefined ? parser.parseExpr(req.expr, true) : parser.parseSelect(req.query, true)
        out = { id: req.id, ast: JSON.parse(text) }
    } catch (e) {
        out = { id: req ? req.id : null, ast: { error: true, type: 'BridgeError', message: String(e && e.message || e) } }
    }
    process.stdout.write(JSON.stringify(out) + '\n')
})
rl.on('close', () => process.exit(0))
