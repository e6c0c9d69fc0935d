// Runs an ONNX model on onnxruntime's CPU provider, for tests/test_onnx_export.cpp:
//   node run_onnx.mjs MODEL.onnx INPUT.f32 N,H,W,C OUTPUT.f32 [LEVEL]
// INPUT.f32 is the one input tensor as raw little-endian float32 in the
// given shape; the model's one output is written to OUTPUT.f32 the same way,
// and its shape printed on stdout ("output 16,10"). LEVEL is onnxruntime's
// graph optimization level: "all" (its default: QDQ groups fused into its
// int8 kernels, QLinearConv for hfq's graphs) or "basic" (no such fusion:
// every operator as the ONNX standard defines it).
//
// Session config session.x64quantprecision = 1, always: on x86 without VNNI
// onnxruntime's u8 x s8 convolution kernel adds pairs of products in
// saturating int16 (vpmaddubsw), and it turns hfq's signed input codes into
// uint8 codes with zero point 128, so an 8-bit layer (the first convolution)
// saturates: 147 * 127 + 151 * 107 = 34,826 > 32,767 (docs/deploy.md). This
// option makes it use the u8 x u8 kernel for such weights, whose pair sums
// are exact in int32; elsewhere (VNNI, ARM) it changes nothing.
// Exit code 0 on success, 1 (with the error on stderr) otherwise.
import { readFileSync, writeFileSync } from 'node:fs';
import ort from 'onnxruntime-node';

async function main() {
  const [model, inputPath, shapeText, outputPath, level = 'all'] = process.argv.slice(2);
  if (!outputPath) throw new Error('usage: node run_onnx.mjs MODEL.onnx INPUT.f32 N,H,W,C OUTPUT.f32 [all|basic]');
  if (level !== 'all' && level !== 'basic') throw new Error(`optimization level '${level}': all or basic`);
  const shape = shapeText.split(',').map(Number);
  const bytes = readFileSync(inputPath);
  const data = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  if (data.length !== shape.reduce((a, b) => a * b, 1))
    throw new Error(`${inputPath} holds ${data.length} floats, not the ${shapeText} the shape says`);
  // One thread: the test's bound holds for any summation order, so threads
  // would change nothing it checks, and ctest runs two tests at once on 2 cores.
  const session = await ort.InferenceSession.create(model, {
    executionProviders: ['cpu'],
    intraOpNumThreads: 1,
    interOpNumThreads: 1,
    graphOptimizationLevel: level,
    extra: { session: { x64quantprecision: '1' } },
  });
  const feeds = { [session.inputNames[0]]: new ort.Tensor('float32', data, shape) };
  const result = await session.run(feeds);
  const out = result[session.outputNames[0]];
  writeFileSync(outputPath, Buffer.from(out.data.buffer, out.data.byteOffset, out.data.byteLength));
  console.log(`output ${out.dims.join(',')}`);
}

main().catch((e) => {
  console.error(`run_onnx: ${e.message}`);
  process.exit(1);
});
